#!/usr/bin/env bash
# The compose `submit` service: publish a model bundle into the shared volume if there is none yet, then submit
# the personalize job (which creates the topics with ONRAMP_TOPIC_PARTITIONS partitions and replaces an older
# Onramp job). Configuration: the ONRAMP_* variables set in docker/compose.yaml.
set -euo pipefail

# The TaskManagers get the same ONRAMP_PSEUDONYM_KEY from compose.yaml; `onramp submit` cannot check theirs (they
# are remote), so check this copy here: a too-short key fails now, in one line, not as a failing job later.
python3.11 - <<'PY'
import sys

from jobs.config import load_config
from udfs.pseudonym import PseudonymKeyError, load_key

try:
    print(f"pseudonymization key {load_key(load_config().pseudonym_key_file).key_id}")
except PseudonymKeyError as exc:
    sys.exit(f"error: {exc}")
PY

if [[ ! -s "${ONRAMP_MODEL_DIR:?}/CURRENT" ]]; then
    echo "no model bundle in ${ONRAMP_MODEL_DIR}; training one on generated history"
    onramp train --users "${ONRAMP_TRAIN_USERS:-2000}"
fi
exec onramp submit
