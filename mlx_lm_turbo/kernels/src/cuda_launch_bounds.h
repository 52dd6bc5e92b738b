// MLX writes the kernel's declaration itself, after the header: launch bounds reach it only
// through the __global__ macro. With (NT, 4) the mma kernel keeps to 128 registers, so 4
// blocks share an SM and the default grid (plan.TARGET_BLOCKS) is one wave on a 132-SM
// GPU.
#undef __global__
#define __global__ __attribute__((global)) __launch_bounds__(${nt}, ${blocks})
