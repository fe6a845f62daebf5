"""The marks of sdpo's two cache files in their safetensors metadata: format versions and
metadata names of the reference log-prob cache (``sdpo.cache``) and of the token cache
(``sdpo.engine.token_cache``).

They live apart from the code that writes and reads the files, which needs torch, so that
``sdpo cache list`` and ``sdpo cache prune`` (``sdpo.cache_folder``) read a folder of them
without importing it (seconds of a command that reads a few headers).
"""

from __future__ import annotations

# the reference log-prob cache (sdpo.cache). Bump the version when the file layout or the
# meaning of a stored field changes; older files are then reported as "format version"
# mismatches and recomputed. 2: under bf16-mixed the reference values round the log-prob
# head's inputs to bf16, as the training forward does.
REF_CACHE_VERSION = "2"
REF_META_VERSION = "sdpo_ref_cache_version"
REF_META_CHECKSUM = "tensors_sha256"
REF_META_KEY_PREFIX = "key."  # one entry per key field: "key.<field>" -> its JSON

# the token cache (sdpo.engine.token_cache). Bump the version when the file layout or the
# meaning of a stored field changes.
TOKEN_CACHE_VERSION = "1"
TOKEN_META_VERSION = "sdpo_token_cache_version"
TOKEN_META_KEY = "key"  # the whole key as JSON
TOKEN_META_INFO = "info"  # source names and tokenize stats (JSON)
TOKEN_META_CHECKSUM = "sha256"
