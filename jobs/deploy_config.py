"""Flink configuration for the Docker image, from the same settings as the local cluster (jobs/services.py).

The image bakes :func:`jobs.services.flink_cluster_settings` into ``$FLINK_HOME/conf/config.yaml`` at build
time, so a JobManager or TaskManager started from it runs Python the way the local cluster does (thread mode,
bundle size and time, slots, managed memory). What depends on the container (addresses, checkpoint
directories, process memory) comes from docker/compose.yaml's ``FLINK_PROPERTIES`` or the FlinkDeployment's
``flinkConfiguration``; tests/test_deploy_manifests.py checks both agree with the local values.

    python -m jobs.deploy_config image-conf /opt/flink/conf/config.yaml    # rewrite it in place (Dockerfile)
    python -m jobs.deploy_config show                                      # print the settings as YAML
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from jobs.config import OnrampConfig, load_config
from jobs.services import flatten_flink_yaml, flink_cluster_settings


def image_flink_settings(cfg: OnrampConfig) -> dict[str, Any]:
    """What the image's config.yaml gets on top of the distribution's: Onramp's cluster settings, and the Python
    that runs the operators (the image's own interpreter, which has Onramp and its dependencies installed)."""
    return {
        **flink_cluster_settings(cfg),
        "python.executable": sys.executable,
        "python.client.executable": sys.executable,
    }


def render_flink_conf(base_text: str, settings: dict[str, Any]) -> str:
    """``base_text`` (a Flink config.yaml) flattened, with ``settings`` on top, as flat-key YAML (valid in 2.x)."""
    flat = flatten_flink_yaml(base_text)
    flat.update(settings)
    header = "# Generated at image build by `python -m jobs.deploy_config image-conf` (jobs/services.py settings).\n"
    return header + yaml.safe_dump(flat, default_flow_style=False, sort_keys=True, width=10_000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.deploy_config", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="action", required=True)
    image = sub.add_parser("image-conf", help="rewrite a Flink config.yaml in place with Onramp's settings")
    image.add_argument("config_yaml", type=Path)
    sub.add_parser("show", help="print the settings the image gets, as YAML")
    args = parser.parse_args(argv)
    settings = image_flink_settings(load_config())
    if args.action == "show":
        sys.stdout.write(yaml.safe_dump(settings, default_flow_style=False, sort_keys=True))
        return 0
    path: Path = args.config_yaml
    path.write_text(render_flink_conf(path.read_text(), settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
