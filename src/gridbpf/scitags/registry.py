"""The registry of experiments and activities, in scitags.org's api.json format.

{"experiments": [{"expName": "atlas", "expId": 2,
                  "activities": [{"activityName": "Production Input", "activityId": 15}, ...]}]}
The package ships a copy (gridbpf/data/scitags-api.json); `gridbpf scitags registry update
FILE` installs a newer one at UPDATED_PATH, which then takes precedence.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .label import check_ids

UPDATED_PATH = Path(os.environ.get("GRIDBPF_SCITAGS_REGISTRY", "/var/lib/gridbpf/scitags-api.json"))


class RegistryError(ValueError):
    """An experiment/activity that is not in the registry, or a malformed registry file."""


@dataclass(frozen=True)
class Experiment:
    id: int
    name: str
    activities: dict[int, str]      # id -> name


class Registry:
    def __init__(self, data: dict, source: str = "?"):
        self.source = source
        self.experiments: dict[int, Experiment] = {}
        try:
            entries = data["experiments"]
            if not isinstance(entries, list):
                raise TypeError("'experiments' is not a list")
            for i, e in enumerate(entries):
                where = f"experiments[{i}]"
                exp_id, name = e["expId"], e["expName"]
                if not isinstance(exp_id, int) or not isinstance(name, str):
                    raise TypeError(f"{where}: expId must be an integer and expName a string")
                acts = {}
                for j, a in enumerate(e.get("activities", [])):
                    act_id, act_name = a["activityId"], a["activityName"]
                    if not isinstance(act_id, int) or not isinstance(act_name, str):
                        raise TypeError(f"{where}.activities[{j}]: activityId must be an integer")
                    check_ids(exp_id, act_id)
                    acts[act_id] = act_name
                check_ids(exp_id, 0)
                if exp_id in self.experiments:
                    raise ValueError(f"{where}: experiment id {exp_id} appears twice")
                self.experiments[exp_id] = Experiment(exp_id, name, acts)
        except (KeyError, TypeError, ValueError) as exc:
            detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise RegistryError(f"registry {source}: {detail}") from None
        self.version = data.get("version")
        self._by_name = {e.name.lower(): e for e in self.experiments.values()}

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Registry":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as exc:
            raise RegistryError(f"registry {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise RegistryError(f"registry {path}: not JSON ({exc.msg} at line {exc.lineno})") from None
        return cls(data, str(path))

    @classmethod
    def bundled(cls) -> "Registry":
        ref = resources.files("gridbpf").joinpath("data/scitags-api.json")
        return cls(json.loads(ref.read_text(encoding="utf-8")), "bundled scitags-api.json")

    @classmethod
    def load(cls, path: str | None = None) -> "Registry":
        """PATH if given, else an updated registry if one was installed, else the bundled one."""
        if path:
            return cls.from_file(path)
        if UPDATED_PATH.exists():
            return cls.from_file(UPDATED_PATH)
        return cls.bundled()

    # --- lookups -------------------------------------------------------------------------------

    def experiment(self, value: int | str) -> Experiment:
        """By id (int or decimal string) or name (case-insensitive)."""
        if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            exp = self.experiments.get(int(value))
            if exp is None:
                raise RegistryError(f"experiment id {int(value)} is not in the registry")
            return exp
        exp = self._by_name.get(str(value).strip().lower())
        if exp is None:
            raise RegistryError(f"experiment {value!r} is not in the registry")
        return exp

    def activity(self, exp: Experiment, value: int | str) -> tuple[int, str]:
        if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
            act_id = int(value)
            if act_id not in exp.activities:
                raise RegistryError(f"activity id {act_id} is not registered for experiment {exp.name}")
            return act_id, exp.activities[act_id]
        want = str(value).strip().lower()
        for act_id, name in exp.activities.items():
            if name.lower() == want:
                return act_id, name
        raise RegistryError(f"activity {value!r} is not registered for experiment {exp.name}")

    def resolve(self, experiment: int | str, activity: int | str) -> tuple[int, int, str, str]:
        """(experiment id, activity id, experiment name, activity name), or RegistryError."""
        exp = self.experiment(experiment)
        act_id, act_name = self.activity(exp, activity)
        return exp.id, act_id, exp.name, act_name

    def names(self, experiment: int, activity: int) -> tuple[str | None, str | None]:
        exp = self.experiments.get(experiment)
        if exp is None:
            return None, None
        return exp.name, exp.activities.get(activity)

    def entries(self):
        for exp in self.experiments.values():
            for act_id, act_name in exp.activities.items():
                yield exp.id, act_id, exp.name, act_name

    def to_json(self) -> list[dict]:
        return [{"experiment": e.name, "id": e.id,
                 "activities": [{"activity": n, "id": i} for i, n in sorted(e.activities.items())]}
                for e in sorted(self.experiments.values(), key=lambda e: e.id)]


def install(path: str | os.PathLike, dest: Path = UPDATED_PATH) -> Registry:
    """Validate PATH as a registry and install it at DEST (atomically) for later loads."""
    reg = Registry.from_file(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text(Path(path).read_text(encoding="utf-8"), encoding="utf-8")
    os.replace(tmp, dest)
    reg.source = str(dest)
    return reg
