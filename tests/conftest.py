"""Shared test setup: no network, ever (tiny models are built from config classes)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Every process group of the tests is on this machine; gloo would otherwise pick its interface by
# resolving the host name, which on some machines names an address that is not theirs (a hang).
# Set before any test starts Ray, so that Ray's workers inherit it.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
