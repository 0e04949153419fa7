#!/usr/bin/env python3
"""A small TFTP read client (RFC 1350, 2347-2349, 7440) for kiln's tests and benchmarks. Stdlib only.

Reads one file with the options asked for, checks the OACK, and prints one JSON object: bytes, sha256, seconds,
rate, the OACK, and how many duplicate or out-of-order DATA packets arrived. It can misbehave on purpose, to
exercise the server's retransmission: --drop-ack N skips the first ACK of block N (0 = the OACK's ACK),
--drop-data N pretends the first copy of block N was lost, --stranger sends an ACK from a second port and reports
the server's answer to it.

Example (throughput of a 30 MiB file):
  scripts/bench/tftp-client.py 127.0.0.1 6969 big.bin --blksize 1468 --windowsize 16 --tsize
"""

import argparse
import hashlib
import json
import socket
import struct
import sys
import time

RRQ, DATA, ACK, ERROR, OACK = 1, 3, 4, 5, 6


def parse_strings(body):
    parts = body.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "replace") for p in parts]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("name")
    ap.add_argument("--mode", default="octet")
    ap.add_argument("--blksize", type=int)
    ap.add_argument("--windowsize", type=int)
    ap.add_argument("--tsize", action="store_true", help="send tsize 0 and report the answer")
    ap.add_argument("--timeout", type=int, help="send the timeout option (seconds)")
    ap.add_argument("--client-timeout", type=float, default=2.0, help="seconds before re-sending the last ACK")
    ap.add_argument("--retries", type=int, default=5)
    ap.add_argument("--drop-ack", type=int, action="append", default=[])
    ap.add_argument("--drop-data", type=int, action="append", default=[])
    ap.add_argument("--stranger", action="store_true")
    ap.add_argument("--output", help="also write the received bytes here")
    args = ap.parse_args()

    options = []
    if args.blksize is not None:
        options += ["blksize", str(args.blksize)]
    if args.windowsize is not None:
        options += ["windowsize", str(args.windowsize)]
    if args.tsize:
        options += ["tsize", "0"]
    if args.timeout is not None:
        options += ["timeout", str(args.timeout)]
    request = struct.pack("!H", RRQ) + b"".join(s.encode() + b"\0" for s in [args.name, args.mode] + options)

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.settimeout(args.client_timeout)
    result = {"ok": False, "oack": None, "duplicates": 0, "out_of_order": 0, "acks_dropped": 0, "acks_sent": 0}
    drop_ack = set(args.drop_ack)
    drop_data = set(args.drop_data)

    blksize, window = 512, 1
    expected = 1  # absolute number of the next block wanted
    in_window = 0
    server = None
    digest = hashlib.sha256()
    out = open(args.output, "wb") if args.output else None
    received = 0
    last_sent = request
    start = time.perf_counter()

    def send_ack(block):
        nonlocal last_sent
        packet = struct.pack("!HH", ACK, block & 0xFFFF)
        last_sent = packet
        if block in drop_ack:
            drop_ack.discard(block)
            result["acks_dropped"] += 1
            return
        result["acks_sent"] += 1
        sock.sendto(packet, server)

    sock.sendto(request, (args.host, args.port))
    tries = 0
    done = False
    while not done:
        try:
            packet, addr = sock.recvfrom(65536)
        except socket.timeout:
            tries += 1
            if tries > args.retries:
                result["error"] = f"timed out waiting for block {expected}"
                break
            sock.sendto(last_sent, server or (args.host, args.port))
            continue
        if server is None:
            server = addr
        elif addr != server:
            continue
        if len(packet) < 4:
            result["error"] = f"short packet {packet!r}"
            break
        opcode, number = struct.unpack("!HH", packet[:4])
        if opcode == ERROR:
            result["error_code"] = number
            result["error_message"] = packet[4:].split(b"\0")[0].decode("utf-8", "replace")
            break
        if opcode == OACK:
            if result["oack"] is not None:
                result["duplicates"] += 1
                send_ack(0)
                continue
            strings = parse_strings(packet[2:])
            oack = dict(zip(strings[0::2], strings[1::2]))
            result["oack"] = oack
            blksize = int(oack.get("blksize", 512))
            window = int(oack.get("windowsize", 1))
            send_ack(0)
            continue
        if opcode != DATA:
            result["error"] = f"unexpected opcode {opcode}"
            break
        if result["oack"] is None and options and expected == 1:
            result["oack"] = {}
        tries = 0
        if number == expected & 0xFFFF:
            if expected in drop_data:
                drop_data.discard(expected)
                continue
            data = packet[4:]
            digest.update(data)
            if out:
                out.write(data)
            received += len(data)
            expected += 1
            in_window += 1
            if len(data) < blksize:
                send_ack(expected - 1)
                done = True
            elif in_window >= window:
                send_ack(expected - 1)
                in_window = 0
            if args.stranger and expected == 2:
                args.stranger = False
                other = socket.socket(sock.family, socket.SOCK_DGRAM)
                other.settimeout(2)
                other.sendto(struct.pack("!HH", ACK, 1), server)
                try:
                    answer, _ = other.recvfrom(1024)
                    result["stranger_answer"] = list(struct.unpack("!HH", answer[:4]))
                except socket.timeout:
                    result["stranger_answer"] = None
                other.close()
        else:
            # A gap or a resent block: tell the server the last block we have, in order (RFC 7440).
            if (expected - number) & 0xFFFF < 0x8000:
                result["duplicates"] += 1
            else:
                result["out_of_order"] += 1
            send_ack(expected - 1)
            in_window = 0
    secs = time.perf_counter() - start
    if out:
        out.close()
    result.update(
        ok=done,
        bytes=received,
        sha256=digest.hexdigest(),
        secs=round(secs, 4),
        mb_per_s=round(received / secs / 1e6, 2) if secs > 0 else None,
        blksize=blksize,
        windowsize=window,
    )
    print(json.dumps(result))
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
