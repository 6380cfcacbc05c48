"""Stage three: fine-tuning a fitted head with the top of its base, and the from-scratch baseline."""
