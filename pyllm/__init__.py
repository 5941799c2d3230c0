"""pyllm — a small, fast, honest GPT runtime: hand-written kernels under the four-stage assistant recipe."""
__version__ = "0.1.0"

from .config import ModelConfig, preset, PRESETS  # noqa: F401,E402
