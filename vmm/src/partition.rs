//! A partition: one KVM VM, its memory, devices and vCPU threads.
