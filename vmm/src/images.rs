//! Guest images built together with amsvm (the workload unikernel).
