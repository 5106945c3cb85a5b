// CPU emulation stub of cuda_fp16.h: only so that the kernels' fp16 overloads compile (the emulation
// harness runs the fp64 kernels); the value is kept as a float.
#pragma once
#include "cuda_emu.h"
struct __half { float x; };
struct __half2 { __half x, y; };
inline float __half2float(__half h) { return h.x; }
inline __half __float2half_rn(float f) { return {f}; }
inline float2 __half22float2(__half2 h) { return {h.x.x, h.y.x}; }
inline __half2 __floats2half2_rn(float a, float b) { return {{a}, {b}}; }
