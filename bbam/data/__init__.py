"""Datasets: readers (VOC, COCO), the synthetic default, downloads, checks and writers."""
