//! The VIOS-role paging server. Today a skeleton: the paging engine (slot maps, the
//! paging-device format, request handling) and its unikernel image arrive with the
//! paging-server issue; the hypervisor side uses the in-process store until then.
#![no_std]
