//! The boot server's persistent state: leases, discovered machines, boot events.
