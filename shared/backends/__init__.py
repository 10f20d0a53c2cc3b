"""Fine-tune backends behind the `FineTuneBackend` port (`base.py`)."""
