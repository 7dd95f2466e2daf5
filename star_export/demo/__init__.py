"""The demo model in the making: a synthetic question set (``scenes``) and the loop that trains a small
vision-language model on it from scratch (``train``, ``tools/train_demo.py``)."""
