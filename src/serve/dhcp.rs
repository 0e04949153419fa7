//! DHCP (RFC 2131/2132) and PXE (RFC 4578) boot decisions and the DHCP socket loop.
