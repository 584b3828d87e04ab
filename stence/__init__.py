"""StenCE platform: ECG-angiography contrastive pretraining for severe coronary stenosis."""

__version__ = "0.1.0"
