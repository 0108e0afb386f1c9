"""Records and manifests as a hostile user writes them: every one is used correctly or refused in one
line naming the file and the field; none gives a traceback or a wrong image with exit 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from diffedit.errors import DiffeditError
from diffedit.records import FORMAT, load_record

ENGINES = ["ddim", "ddpm-ef", "bdia", "direct", "infedit"]
FIELDS = ["steps", "seed", "size", "guidance_scale", "model", "engine", "source_prompt", "negative_prompt"]
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(min_value=-5, max_value=10**6), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def records(tmp_path_factory, tiny_folder):
    """One real record per engine, inverted on the tiny SD1 model, and that model's folder."""
    from diffedit.cli.main import run

    root = tmp_path_factory.mktemp("records")
    image = root / "in.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    model = tiny_folder("sd1")
    made = {}
    for engine in ENGINES:
        made[engine] = root / f"{engine}.safetensors"
        assert run(["invert", str(image), "-p", "a red square", "-m", str(model), "-e", engine, "-n", "4",
                    "-o", str(made[engine]), "-q", "--no-check"]) == 0
    return made, model


def _rewrite(source: Path, target: Path, meta: dict | None = None, tensors: dict | None = None) -> None:
    """The record with its header and/or tensors replaced, written as a raw safetensors file (so the
    stored checksum is kept as it was, stale)."""
    record = load_record(source)
    save_file({k: v.contiguous() for k, v in (tensors if tensors is not None else record.tensors).items()},
              str(target), metadata={"diffedit": json.dumps(meta if meta is not None else record.meta)})


def _reconstruct(cli, record: Path, model: Path, out: Path):
    return cli("reconstruct", record, "-m", model, "-o", out, "-q", "--overwrite")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(engine=st.sampled_from(ENGINES), field=st.sampled_from(FIELDS), value=HOSTILE, keep_checksum=st.booleans())
def test_a_tampered_header_is_refused_in_one_line(cli, records, tmp_path, engine, field, value, keep_checksum):
    made, model = records
    meta = dict(load_record(made[engine]).meta)
    if meta.get(field) == value:
        return
    meta[field] = value
    if not keep_checksum:  # a forger who also drops the checksum
        meta.pop("checksum")
    bad = tmp_path / "bad.safetensors"
    _rewrite(made[engine], bad, meta=meta)
    out = tmp_path / "out.png"
    out.unlink(missing_ok=True)
    code, _, err = _reconstruct(cli, bad, model, out)
    assert "Traceback" not in err and "this is a bug" not in err
    assert code == 1 and not out.exists() and str(bad) in err
    assert ("changed after it was written" if keep_checksum else "has no checksum") in err


def _unchecked(meta: dict, tensors: dict) -> dict:
    """The header with a checksum made for these (changed) tensors: what the schema alone must catch."""
    from diffedit.records import checksum

    meta = {k: v for k, v in meta.items() if k != "checksum"}
    return {**meta, "checksum": checksum(meta, tensors)}


@pytest.mark.parametrize("engine, change, message", [
    ("ddpm-ef", lambda t: {**t, "xs": t["xs"][1:]}, "tensor 'xs' is [3,"),
    ("direct", lambda t: {**t, "trajectory": t["trajectory"][:-1]}, "tensor 'trajectory' is [4,"),
    ("ddim", lambda t: {k: v for k, v in t.items() if k != "noise"}, "tensor 'noise', which is missing"),
    ("ddim", lambda t: {k: v for k, v in t.items() if k != "latent"}, "no tensor 'latent'"),
    ("bdia", lambda t: {**t, "noise": t["noise"][..., :4, :4]}, "tensor 'noise' is"),
    ("ddim", lambda t: {**t, "latent": t["latent"][..., :4]}, "tensor 'latent' is"),
])
def test_tensors_that_disagree_with_the_header_are_named(cli, records, tmp_path, engine, change, message):
    made, model = records
    record = load_record(made[engine])
    tensors = change(dict(record.tensors))
    bad = tmp_path / "bad.safetensors"
    _rewrite(made[engine], bad, meta=_unchecked(record.meta, tensors), tensors=tensors)
    code, _, err = _reconstruct(cli, bad, model, tmp_path / "out.png")
    assert code == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()


def test_steps_that_disagree_with_stored_levels_are_refused(cli, records, tmp_path):
    """The defect seen: an edit-friendly record whose header said one step fewer wrote a wrong image."""
    made, model = records
    record = load_record(made["ddpm-ef"])
    bad = tmp_path / "bad.safetensors"
    _rewrite(made["ddpm-ef"], bad, meta=_unchecked({**record.meta, "steps": 3}, record.tensors))
    code, _, err = _reconstruct(cli, bad, model, tmp_path / "out.png")
    assert code == 1 and "tensor 'xs' is [4," in err and "of 3 steps" in err


def test_a_changed_tensor_is_named_by_the_checksum(records, tmp_path):
    made, _ = records
    record = load_record(made["ddim"])
    tensors = dict(record.tensors)
    tensors["noise"] = tensors["noise"] + 1e-3
    bad = tmp_path / "bad.safetensors"
    _rewrite(made["ddim"], bad, tensors=tensors)
    with pytest.raises(DiffeditError, match="changed after it was written"):
        load_record(bad)


def test_checksummed_records_round_trip(records):
    made, _ = records
    for path in made.values():
        record = load_record(path)
        assert record.meta["format"] == FORMAT and len(record.meta["checksum"]) == 64


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.one_of(
    st.dictionaries(st.sampled_from(["command", "id", "prompt", "output", "steps", "seed", "image", "bogus"]),
                    HOSTILE | st.sampled_from(["generate", "edit", "../x.png", "/etc/passwd", "results.jsonl", "-"]),
                    max_size=5),
    st.text(max_size=20)), min_size=1, max_size=4))
def test_hostile_manifests_never_crash_the_batch(rows):
    """Any manifest lines: the batch plans them (bad jobs become failed rows) or refuses the manifest in
    one line; planning never raises anything else."""
    import tempfile

    from diffedit.cli import manifest

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "jobs.jsonl"
        path.write_text("".join((json.dumps(r, default=str) if isinstance(r, dict) else r.replace("\n", " ")) + "\n"
                                for r in rows))
        try:
            entries, base, name = manifest.read_manifest(str(path))
            jobs = manifest.plan(entries, base, Path(folder) / "out", name)
        except DiffeditError as err:
            assert "\n" not in str(err)
            return
        for job in jobs:
            assert job.error is None or "\n" not in job.error
            for output in job.outputs:
                assert output.resolve().is_relative_to((Path(folder) / "out").resolve())
                assert output.name != "results.jsonl"


@pytest.mark.parametrize("steps", [-1, -5, 0, 40, "five", 10**12, None, 2.5])  # 40: ten times the true 4
def test_the_reported_step_counts_are_refused(cli, records, tmp_path, steps):
    """The report's probes, with a checksum forged to match (else the checksum names the change): each
    named in one line, exit 1, nothing written. 40 is a valid count that no ddim tensor contradicts:
    only the checksum catches that one (test_a_tampered_header_is_refused_in_one_line)."""
    made, model = records
    record = load_record(made["ddim"])
    bad = tmp_path / "bad.safetensors"
    _rewrite(made["ddim"], bad, meta=_unchecked({**record.meta, "steps": steps}, record.tensors))
    code, _, err = _reconstruct(cli, bad, model, tmp_path / "out.png")
    if steps == 40:
        assert code == 0
        return
    assert code == 1 and "record field 'steps' must be an integer from 1 to 1000" in err
    assert not (tmp_path / "out.png").exists()


OPTION_VALUES = st.one_of(st.integers(min_value=-3, max_value=2**65), st.floats(allow_nan=True, allow_infinity=True),
                          st.sampled_from(["", "-", "nan", "x", "cfgpp", "pag", "ddim", "1e308", "-1"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=st.dictionaries(st.sampled_from(["--seed", "-n", "-g", "--eta", "--guidance", "--pag-scale",
                                                "--negative-prompt", "--dtype", "--engine"]),  # sizes: tested above
                               OPTION_VALUES, max_size=3))
def test_any_option_set_is_run_or_refused_in_one_line(cli, tiny_folder, tmp_path, options):
    """`generate` with hostile option values: exit 0 with an image, or 1/2 with one line and nothing written."""
    out = tmp_path / "o.png"
    out.unlink(missing_ok=True)
    args = [a for key, value in options.items() for a in (key, str(value))]
    if "-n" not in options:
        args += ["-n", "2"]
    code, _, err = cli("generate", "a red circle", "-m", tiny_folder("sd1"), "-o", out, "-q", *args)
    assert "Traceback" not in err and "this is a bug" not in err
    if code == 0:
        assert out.exists()
    else:
        assert code in (1, 2) and not out.exists()
        assert err.strip().splitlines()[-1].startswith("error: ")
