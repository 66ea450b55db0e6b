"""The XLA:CPU lowerings of flaxrestore's primitives, and the native kernels behind them.

Everything here computes the same function as a primitive of :mod:`flaxrestore.layers` (torch
semantics, NHWC / HWIO), only faster on XLA:CPU, which lowers some library ops poorly
(``feature_group_count`` depthwise convs, kernel gradients of convs, select-and-scatter,
gathers, convs to or from very few channels). The layers reach this package only through the
seam :func:`flaxrestore.lowering.per_platform`, so it is compiled into CPU programs only; models
never import it, and a TPU or GPU program never contains any of it.

Modules:

* :mod:`~flaxrestore.xla_cpu.convs` - dense convs: Winograd F(2x2, 3x3), narrow-output convs as
  one matmul and a shifted sum, kernel gradients as matmuls over shifted windows, the input
  gradients that go with them, valid and transposed convs, the split conv of a concatenation;
* :mod:`~flaxrestore.xla_cpu.depthwise` - depthwise and grouped convs as shifted multiply-adds
  with hand-written backwards, and sums of dilated depthwise branches on one padded copy;
* :mod:`~flaxrestore.xla_cpu.sampling` - the deformable conv's bilinear sampling by a native
  kernel;
* :mod:`~flaxrestore.xla_cpu.remat` - materialisation and a recomputation XLA:CPU cannot merge
  away (it strips ``jax.checkpoint``'s barrier);
* :mod:`~flaxrestore.xla_cpu.pooling` - VGG's 2x2 max-pool with its own gradient;
* :mod:`~flaxrestore.xla_cpu.norms` - the global gradient norm over one flat vector;
* :mod:`~flaxrestore.xla_cpu.tuning` - process and compiler settings for the CPU backend (the
  memory-saving scheduler, glibc malloc, XNNPACK convs); entry points opt in explicitly;
* :mod:`~flaxrestore.xla_cpu.native` - the C++ kernels (``native/*.cc``) called through the XLA
  FFI, compiled on first use.
"""
