"""Search-space presets and their schema (nothing here imports Ray)."""

__all__: list[str] = []
