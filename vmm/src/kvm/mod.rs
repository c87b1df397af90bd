//! KVM VM and vCPU setup, memory layout, boot paths.
pub mod acpi;
pub mod linux;
pub mod memory;
pub mod native;
pub mod vcpu;
pub mod vm;
