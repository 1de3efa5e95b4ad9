#!/usr/bin/env bash
# The compose `submit` service: publish a model bundle into the shared volume if there is none yet, then submit
# the personalize job (which creates the topics with ONRAMP_TOPIC_PARTITIONS partitions and replaces an older
# Onramp job). Configuration: the ONRAMP_* variables set in docker/compose.yaml.
set -euo pipefail

if [[ ! -s "${ONRAMP_MODEL_DIR:?}/CURRENT" ]]; then
    echo "no model bundle in ${ONRAMP_MODEL_DIR}; training one on generated history"
    onramp train --users "${ONRAMP_TRAIN_USERS:-2000}"
fi
exec onramp submit
