"""Data in: decoding images as mmdetection does and listing them on disk (:mod:`.images`), decoding ahead of the
network (:mod:`.pipeline`), COCO-format datasets for evaluation (:mod:`.coco`) and the synthetic shapes data set
and images (:mod:`.synthetic`)."""

from paadet.data.images import IMAGE_EXTENSIONS, ImageReadError, ImageSource, decode_image, list_images, read_image

__all__ = ["IMAGE_EXTENSIONS", "ImageReadError", "ImageSource", "decode_image", "list_images", "read_image"]
