"""study: robustness transfer from pre-training to fine-tuning."""
