"""Segmentation networks trained on BBAM pseudo labels (Mask R-CNN, DeepLabV3)."""
