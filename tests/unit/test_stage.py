"""The stage protocol: registration, optional dependencies, error isolation."""

from __future__ import annotations

from typing import ClassVar

import pyarrow as pa
import pytest

from curation.cli import main
from curation.runner import apply_stages
from curation.schema import from_rows
from curation.stage import REGISTRY, MissingDependency, ScoreFilter, register
from curation.stats import new_counter


@register
class _NeedsExtra(ScoreFilter):
    """Test stage that needs a package nobody has."""

    name: ClassVar[str] = "test_needs_extra"
    requires: ClassVar[tuple[tuple[str, str], ...]] = (("no_such_module_xyz", "clip"),)


@register
class _Explodes(ScoreFilter):
    """Test stage that raises on every batch."""

    name: ClassVar[str] = "test_explodes"

    def score(self, batch):
        raise RuntimeError("model fell over")


def test_missing_extra_names_the_install_command(tmp_path, tiny_corpus, capsys):
    with pytest.raises(MissingDependency, match=r"pip install 'keye-curation\[clip\]'"):
        REGISTRY["test_needs_extra"]().check_requirements()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"sources: [{{name: w, format: webdataset, modality: image_text, paths: ['{tiny_corpus}/wds']}}]\n"
        f"stages: [test_needs_extra]\noutput: {{path: {tmp_path / 'pool'}}}\n"
    )
    assert main(["run", str(recipe), "-q"]) == 2
    assert "pip install 'keye-curation[clip]'" in capsys.readouterr().err
    assert not (tmp_path / "pool").exists()


def test_a_stage_that_raises_rejects_its_batch_instead_of_killing_the_run():
    stage = REGISTRY["test_explodes"]()
    batch = from_rows([{"id": str(i), "modality": "text", "text": "x"} for i in range(3)])
    counters = {"test_explodes": new_counter()}
    out = apply_stages(batch, [stage], counters)
    assert out["reject_reason"].to_pylist() == ["stage_error"] * 3
    assert "RuntimeError: model fell over" in out["reject_detail"][0].as_py()
    assert counters["test_explodes"]["drops"] == {"stage_error": 3}
    assert isinstance(out, pa.Table)
