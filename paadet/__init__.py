"""paadet: the PAA object detector in pure PyTorch, with mmdetection parity, ONNX export and fast inference."""
__version__ = "0.1.0"
