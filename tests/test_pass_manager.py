"""The pass manager: ordered passes, dumps of changed passes, verification, failures that say where."""

from pathlib import Path

import pytest
import torch

import mpcompiler
from mpcompiler.ir import record
from mpcompiler.pass_manager import Pass, PassManager, PassResult
from mpcompiler.passes import AssignPrecision, EliminateCasts
from tests.helpers import Tiny, nodes_by_op, stages


class NoOp(Pass):
    def call(self, gm):
        return PassResult(modified=False)


class Boom(Pass):
    def call(self, gm):
        raise RuntimeError("kaboom")


class BreakDtype(Pass):
    """Plans bf16 for a node whose kernel computes another dtype: the IR check must catch it."""

    def call(self, gm):
        record(nodes_by_op(gm, "relu")[0]).dtype = torch.bfloat16
        return PassResult(modified=True)


def _lowered():
    return stages(Tiny().eval(), [torch.randn(4, 16)], upto="eliminate_casts")


def test_names_are_one_spelling():
    # a pass's class, its file and its dump share one name: InsertCasts, passes/insert_casts.py, NN_insert_casts.txt
    import mpcompiler.passes as passes

    assert BreakDtype.name() == "break_dtype"
    files = sorted(p.stem for p in Path(passes.__file__).parent.glob("*.py") if p.stem != "__init__")
    classes = [getattr(passes, name) for name in passes.__all__]
    assert sorted(c.name() for c in classes) == files
    for cls in classes:
        assert issubclass(cls, Pass) and cls.__module__ == f"mpcompiler.passes.{cls.name()}"


def test_a_pass_whose_requirement_the_graph_lacks_is_refused():
    # a pipeline in the wrong order: planning before calibration, casts removed before any were inserted
    gm = stages(Tiny().eval(), [torch.randn(4, 16)], upto="lower_fused")
    with pytest.raises(mpcompiler.PassError, match=r"pass 02 assign_precision needs calibrated ranges "
                       r"\(calibrate_ranges\): the graph after capture, no_op has none"):  # fmt: skip
        PassManager([NoOp(), AssignPrecision(dtype=torch.float16)]).run(gm)
    with pytest.raises(mpcompiler.PassError, match=r"eliminate_casts needs the plan's casts inserted"):
        PassManager([EliminateCasts()]).run(_lowered_before_casts())
    assert PassManager([EliminateCasts()]).run(_lowered())[0].name == "eliminate_casts"  # casts there: it runs


def _lowered_before_casts():
    return stages(Tiny().eval(), [torch.randn(4, 16)], upto="place_casts")


def test_failing_pass_names_itself_and_its_predecessors_and_writes_its_ir(tmp_path):
    gm = _lowered()
    with pytest.raises(mpcompiler.PassError) as err:
        PassManager([NoOp(), Boom()], dump_dir=tmp_path).run(gm)
    msg = str(err.value)
    assert msg.startswith("pass 02 boom failed (after capture, no_op): RuntimeError: kaboom")
    failed = tmp_path / "02_boom.failed.txt"
    assert str(failed) in msg and "%linear = linear(" in failed.read_text()


def test_verification_catches_a_plan_the_graph_does_not_realise(tmp_path):
    gm = _lowered()
    with pytest.raises(
        mpcompiler.PassError, match="pass 01 break_dtype failed .*relu is planned bf16 but computes f16"
    ):
        PassManager([BreakDtype()], dump_dir=tmp_path, debug=True).run(gm)
    PassManager([BreakDtype()], debug=False).run(_lowered())  # verification is for tests and debug runs


def test_failed_ir_goes_to_a_temporary_folder_without_dump_dir():
    with pytest.raises(mpcompiler.PassError, match=r"The IR it failed on is in .*mpcompiler-.*01_boom\.failed\.txt"):
        PassManager([Boom()]).run(_lowered())


def test_only_changed_passes_are_dumped_unless_debug(tmp_path):
    gm = _lowered()
    PassManager([NoOp(), BreakDtype()], dump_dir=tmp_path / "a").run(gm)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["00_capture.txt", "02_break_dtype.txt"]
