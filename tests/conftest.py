"""Shared test setup: no network, ever (tiny models are built from config classes)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
