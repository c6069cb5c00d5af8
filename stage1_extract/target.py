"""Target loading lives in schemas.target (stage 3 loads the target too); re-exported here."""
from schemas.target import *  # noqa: F401,F403
from schemas.target import TargetError, converted_dir, gguf_location, load_target, load_tokenizer, resolve_path  # noqa: F401
