// Shared-memory declarations and test-only mutation switches of the device code.
//
// The kernels in csrc/<stem>/<stem>_kernels.cuh are compiled by nvcc and, in the tests, by the host
// compiler under a CPU emulation of CUDA's execution model (tests/emulation/), which poisons shared
// memory at every block and checks every index. `extern __shared__` arrays cannot be checked through
// #defines alone, so kernels declare shared arrays with these macros:
//   FC_SHARED(type, name, count)    a static array of `count` elements (count a constant expression)
//   FC_DYNAMIC_SHARED(type, name)   the launch's dynamic shared memory, viewed as `type`
//   FC_SHARED_CAST(type, p)          p (into shared memory) viewed as `type` elements: the typed arrays a
//                                    kernel carves out of its dynamic bytes (template kernels declare
//                                    their dynamic memory as bytes: nvcc rejects differently typed
//                                    `extern __shared__` arrays of one name)
// Under nvcc they are the plain declarations and reinterpret_cast; a pointer into them is best held in
// `auto`, and device functions that take one are templates on the pointer type.
//
// FC_MUTATION(NAME) is 0 in every build except an emulated one made with -DFC_MUTATE_NAME=1: the tests
// build variants of the kernels with a known defect (a missing barrier, an off-by-one tail) and check
// that the emulated run catches each. It is only ever used in #if, so nvcc and the wheel compile the
// kernels exactly as written.
#pragma once

#if defined(FASTCASCADE_EMULATION)
#if !defined(FC_EMU_SHARED)
#error "FASTCASCADE_EMULATION: include tests/emulation/cuda_emulation.h before the kernels"
#endif
#define FC_SHARED(type, name, count) FC_EMU_SHARED(type, name, count)
#define FC_DYNAMIC_SHARED(type, name) FC_EMU_DYNAMIC_SHARED(type, name)
#define FC_SHARED_CAST(type, p) (::fc_emu::shared_cast<type>(p))
#define FC_MUTATION(name) (FC_MUTATE_##name + 0)
#else
#define FC_SHARED(type, name, count) __shared__ type name[count]
#define FC_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define FC_SHARED_CAST(type, p) (reinterpret_cast<type*>(p))
#define FC_MUTATION(name) 0
#endif
