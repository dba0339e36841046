/* Makes MKL take the code path it gives CPUs of other vendors (AMD), on an Intel CPU: MKL asks these functions
   whether the CPU is Intel's. Diagnosis only (docs/speed.md, "Decoding on AMD"):
       cc -shared -fPIC -o /tmp/mkl_other_vendor.so bench/mkl_other_vendor.c
       LD_PRELOAD=/tmp/mkl_other_vendor.so python bench/profile_decode.py --gemm */
int mkl_serv_intel_cpu_true(void) { return 0; }
int mkl_serv_intel_cpu(void) { return 0; }
