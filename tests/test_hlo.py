"""Reading compiled programs: loop bodies' matmuls counted once per iteration (XLA counts them once)."""

import jax
import numpy as np
import pytest

from lightjax.model.flops import flops_per_token
from lightjax.runtime.hlo import compiled_flops, loop_corrected_flops
from lightjax.runtime.sharding import shard_batch
from lightjax.train.run import build_run
from lightjax.train.step import synthetic_batch
from tests.helpers import tiny_run_config

# A CPU/GPU-style loop (XLA records its trip count) around a fused [4,8] x [8,16] dot.
CPU_LOOP = """HloModule m

%fused_dot (param_0: f32[4,8], param_1: f32[8,16]) -> f32[4,16] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p: (s32[], f32[4,8], f32[8,16])) -> (s32[], f32[4,8], f32[8,16]) {
  %p = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) parameter(0)
  %a = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %b = f32[8,16]{1,0} get-tuple-element(%p), index=2
  %fusion = f32[4,16]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_dot
  ROOT %t = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) tuple(%i, %a, %b)
}

%cond (p: (s32[], f32[4,8], f32[8,16])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: (s32[], f32[4,8], f32[8,16])) -> (s32[], f32[4,8], f32[8,16]) {
  %x = (s32[], f32[4,8]{1,0}, f32[8,16]{1,0}) parameter(0)
  ROOT %w = (s32[], f32[4,8]) while(%x), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
}
"""

# A TPU-style loop: no recorded trip count, `i < 5` in the condition, i counted from 0 by 1 (the body's
# `i + 1`); a matmul as a convolution.
TPU_LOOP = """HloModule m

%body (p: (s32[], bf16[4,8], bf16[8,16])) -> (s32[], bf16[4,8], bf16[8,16]) {
  %p = (s32[]{:T(128)}, bf16[4,8]{1,0:T(8,128)}, bf16[8,16]{1,0:T(8,128)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %one = s32[]{:T(128)} constant(1)
  %next = s32[]{:T(128)} add(%i, %one)
  %a = bf16[4,8]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %b = bf16[8,16]{1,0:T(8,128)} get-tuple-element(%p), index=2
  %convolution.1 = f32[4,16]{1,0:T(8,128)} convolution(%a, %b), dim_labels=bf_io->bf
  ROOT %t = (s32[]{:T(128)}, bf16[4,8]{1,0:T(8,128)}, bf16[8,16]{1,0:T(8,128)}) tuple(%next, %a, %b)
}

%cond (p: (s32[], bf16[4,8], bf16[8,16])) -> pred[] {
  %constant.7 = s32[]{:T(128)} constant(5)
  %p = (s32[]{:T(128)}, bf16[4,8]{1,0:T(8,128)}, bf16[8,16]{1,0:T(8,128)}) parameter(0)
  %gte = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%gte, %constant.7), direction=LT
}

ENTRY %main (a: bf16[4,8], b: bf16[8,16]) -> (s32[], bf16[4,8], bf16[8,16]) {
  %a = bf16[4,8]{1,0:T(8,128)} parameter(0)
  %b = bf16[8,16]{1,0:T(8,128)} parameter(1)
  %zero = s32[]{:T(128)} constant(0)
  %x = (s32[]{:T(128)}, bf16[4,8]{1,0:T(8,128)}, bf16[8,16]{1,0:T(8,128)}) tuple(%zero, %a, %b)
  ROOT %while = (s32[]{:T(128)}, bf16[4,8]{1,0}, bf16[8,16]{1,0}) while(%x), condition=%cond, body=%body
}
"""


def test_loop_matmuls_are_counted_per_iteration():
    matmul = 2 * 4 * 16 * 8
    assert loop_corrected_flops(CPU_LOOP, 1000.0) == 1000.0 + 2 * matmul  # 3 iterations, XLA counted 1
    assert loop_corrected_flops(TPU_LOOP, 1000.0) == 1000.0 + 4 * matmul  # 5 iterations
    unsigned = TPU_LOOP.replace("s32[]{:T(128)} constant(5)", "u32[] constant(5)")  # a windowed-einsum loop
    assert loop_corrected_flops(unsigned, 1000.0) == 1000.0 + 4 * matmul
    # The partitioner's windowed-einsum loops run two steps an iteration: i + 1 + 1 < 8 is 4 iterations.
    two_steps = TPU_LOOP.replace("constant(5)", "constant(8)").replace(
        "%next = s32[]{:T(128)} add(%i, %one)", "%half = s32[] add(%i, %one)\n  %next = s32[] add(%half, %one)")
    assert loop_corrected_flops(two_steps, 1000.0) == 1000.0 + 3 * matmul
    from_two = TPU_LOOP.replace("%zero = s32[]{:T(128)} constant(0)", "%zero = s32[]{:T(128)} constant(2)")
    assert loop_corrected_flops(from_two, 1000.0) == 1000.0 + 2 * matmul  # 2, 3, 4: 3 iterations
    no_loop = CPU_LOOP.replace('backend_config={"known_trip_count":{"n":"3"}}', "backend_config={}")
    assert loop_corrected_flops(no_loop, 1000.0) == 1000.0  # unknown trip count: left as XLA counted it


def test_a_custom_call_whose_attributes_span_lines_does_not_end_its_computation():
    # A Pallas kernel's custom call writes its backend attributes over several lines, one starting "}}";
    # the loop body's matmul after it is still the body's.
    spanning = TPU_LOOP.replace("  %convolution.1 =", '  %kernel = f32[4] custom-call(%a), custom_call_target="k", '
                                'frontend_attributes={kernel_metadata={"a":\n"b"\n}}, metadata={op_name="k"}\n'
                                "  %convolution.1 =")
    assert loop_corrected_flops(spanning, 1000.0) == loop_corrected_flops(TPU_LOOP, 1000.0)


def test_attention_as_a_convolution_over_a_dilated_input_is_counted():
    # How a TPU program writes q k^T for 2 rows and 8 heads of 256 tokens and head size 8: rows and heads
    # as spatial dimensions of an input dilated so that each output reads one row and one head.
    conv = TPU_LOOP.replace(
        "%convolution.1 = f32[4,16]{1,0:T(8,128)} convolution(%a, %b), dim_labels=bf_io->bf",
        "%q = bf16[2,256,8,8]{1,3,2,0:T(8,128)(2,1)} parameter(1)\n"
        "  %k = bf16[2,256,8,8]{1,3,2,0:T(8,128)(2,1)} parameter(2)\n"
        "  %convolution.1 = f32[2,8,256,256]{2,3,1,0:T(8,128)} convolution(%q, %k), window={size=2x8 stride=1x7 "
        "lhs_dilate=2x8}, dim_labels=0b1f_0o1i->01bf")
    assert loop_corrected_flops(conv, 0.0) == 4 * 2 * 2 * 8 * 256 * 256 * 8  # 4 iterations beyond XLA's one


def _flops_ratios(scan_layers):
    c = tiny_run_config(scan_layers=scan_layers)
    c.model.n_layer = 6
    training = build_run(c, jax.devices()[:1])
    batch = shard_batch(synthetic_batch(np.random.default_rng(0), 8, 16, 96), training.mesh)
    compiled = training.train_step.lower(training.abstract_state, batch).compile()
    model = flops_per_token(training.model.config, 16) * 8 * 16
    analysis = compiled.cost_analysis()
    raw = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
    return raw / model, compiled_flops(compiled) / model


def test_scanned_stack_flops_match_the_loop_layout():
    loop_raw, loop = _flops_ratios(False)
    scan_raw, scan = _flops_ratios(True)
    assert loop == loop_raw  # nothing to correct without loops
    assert scan_raw < 0.5 * loop  # XLA alone counts the 6-layer body once
    assert scan == pytest.approx(loop, rel=0.1)  # element-wise work in the body still counted once


def _collectives(mesh, batch):
    from lightjax.runtime.hlo import collectives, partitioned_text
    from lightjax.runtime.sharding import batch_sharding

    c = tiny_run_config(mesh=mesh)
    c.train.global_batch_size = batch
    training = build_run(c)
    state = training.abstract_state
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.params))
    tokens = jax.ShapeDtypeStruct((batch, 17), np.int32, sharding=batch_sharding(training.mesh))
    _, text = partitioned_text(training.train_step.lower(state, {"tokens": tokens}))
    return {kind: c["bytes"] / param_bytes for kind, c in collectives(text).items()}


def test_collectives_agree_with_the_arithmetic_of_each_layout():
    data = _collectives((8, 1, 1), 8)  # every gradient all-reduced once
    assert data["all-reduce"] == pytest.approx(1.0, rel=0.1) and data["all-gather"] == data["reduce-scatter"] == 0
    fsdp = _collectives((1, 8, 1), 8)  # parameters gathered, gradients reduce-scattered
    assert fsdp["all-gather"] == pytest.approx(1.0, rel=0.1) and fsdp["reduce-scatter"] == pytest.approx(1.0, rel=0.1)
    assert fsdp["all-reduce"] < 0.1  # only the leaves too small to shard
    tensor = [_collectives((1, 1, 8), b)["all-reduce"] for b in (8, 16)]  # activations, not parameters
    assert tensor[1] == pytest.approx(2 * tensor[0], rel=0.1)
    assert _collectives((8, 1, 1), 16)["all-reduce"] == pytest.approx(data["all-reduce"], rel=0.01)
