"""Image input: decoding files as mmdetection does and listing images on disk."""
from .images import IMAGE_EXTENSIONS, ImageReadError, ImageSource, decode_image, list_images, read_image

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "ImageSource", "decode_image", "list_images", "read_image"]
