//! KVM VM and vCPU setup, memory layout, boot paths.
