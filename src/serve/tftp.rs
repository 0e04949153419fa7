//! A read-only TFTP server (RFC 1350) with option negotiation (RFC 2347/2348/2349, 7440).
