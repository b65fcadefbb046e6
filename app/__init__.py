"""imgcls: image classification with selectable CNN and ResNet backbones."""

__version__ = "0.1.0"
