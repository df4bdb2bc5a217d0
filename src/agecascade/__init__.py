"""agecascade: cascaded fine-tuning of CNNs for age estimation."""
