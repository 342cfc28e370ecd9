#!/usr/bin/env python3
"""bench/park_stress.py: many keep-alive clients whose pauses straddle timeouts.client_park.

    python3 bench/park_stress.py PORT CONNECTIONS REQUESTS_PER_CONNECTION

Each client sends requests on one connection: some heads split across a pause about the park
time, some pipelined in pairs, with random quiet gaps between them, and checks every answer is
a 200 whose body is "A\n" (the upstream of bench/run.sh). Run stickylb with client_park = "20ms"
in front of such an upstream; `RUST_LOG=warn,stickylb::server=trace` logs each parking.
Prints "ok N bad M"; exits 1 if any answer was wrong.
"""
import asyncio, random, sys
port, conns, reqs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ok = bad = 0
async def one(i):
    global ok, bad
    r, w = await asyncio.open_connection("127.0.0.1", port)
    for j in range(reqs):
        req = f"GET /c{i}/r{j} HTTP/1.1\r\nHost: s\r\n\r\n".encode()
        # sometimes split the head across a pause near the park time, sometimes pipeline two
        mode = random.random()
        if mode < 0.3:
            cut = random.randrange(1, len(req))
            w.write(req[:cut]); await w.drain()
            await asyncio.sleep(random.uniform(0.015, 0.03))
            w.write(req[cut:]); n = 1
        elif mode < 0.5:
            w.write(req + req); n = 2
        else:
            w.write(req); n = 1
        await w.drain()
        for _ in range(n):
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
            body = await r.readexactly(length)
            if head.startswith(b"HTTP/1.1 200") and body == b"A\n": ok += 1
            else: bad += 1; print("bad", head[:40], body[:20])
        await asyncio.sleep(random.uniform(0.0, 0.045))
    w.close()
async def main():
    await asyncio.gather(*(one(i) for i in range(conns)))
    print("ok", ok, "bad", bad)
    sys.exit(1 if bad else 0)
asyncio.run(main())
