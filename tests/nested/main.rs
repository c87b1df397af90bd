//! Linux guests in the nested harness: QEMU (TCG, an emulated AMD CPU with SVM) boots an
//! L1 Linux that loads kvm_amd and runs this build's amsvm, which boots L2 Linux guests
//! built by guest-images/linux/build.sh. /dev/kvm on the development machines emulates
//! guest kernel code ~4000x slower, so this is where Linux guests are proven.
//!
//! Needs qemu-system-x86_64 and the L2 image (guest-images/linux/build.sh); the L1
//! appliance is built by guest-images/nested/build.sh on first use (downloads cached).
//! Missing pieces fail the tests with what to do; nothing is skipped. The scenarios run
//! one at a time (each QEMU run is CPU heavy) and print their phase timings.

mod harness;

mod balloon;
mod boot;
mod broken;
mod disk;
mod overcommit;
