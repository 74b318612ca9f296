"""Job configuration: YAML job files + dotted overrides, validated into keyword-only dataclasses.

    cfg = load_job("jobs/quickstart.yaml", ["rounds=3", "clients.slowdown=[1,2,2,3]"])

Every error is a ConfigError whose message names the offending key (as a dotted path) and says how to
fix it; the CLI turns it into exit code 2. Values in overrides are parsed as YAML, so lists and dicts
work. Unknown keys are refused with a "did you mean" hint, never ignored.

The package: sections.py (the sections' dataclasses, presets and limits), validation.py (checks across
fields), jobconfig.py (JobConfig, checked when built), reading.py (job files and overrides into a JobConfig).
"""

from ..errors import ConfigError, UserInputError  # noqa: F401 (defined in errors.py; importers of config find them here too)
from .jobconfig import JobConfig  # noqa: F401
from .reading import (  # noqa: F401
    MAX_JOB_BYTES,
    MAX_YAML_NODES,
    _all_keys,
    apply_override,
    build_job,
    read_job,
    safe_yaml,
)
from .sections import *  # noqa: F401,F403 (sections.__all__: every section class, the presets and limits)
from .validation import _check, per_client_values, resolve_variant, validate  # noqa: F401
