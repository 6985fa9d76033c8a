"""The load kit: what the scripts and the tests share to start servers and talk to them.

- ``launcher``: start a server process on a free loopback port, wait until it
  answers, stop it (the gateway, the comparison apps, redis-server);
- ``ws``: a WebSocket client over websockets' Sans-I/O ``ClientProtocol``,
  frames handed to a callback as they arrive;
- ``sse``: one incremental Server-Sent Events parser, and a keep-alive HTTP/1.1
  connection (httptools) that feeds it;
- ``stats``: what a load client measures (percentiles, per-run ``seq`` checks);
- ``load``: the load clients of ``loadtest.py`` (ramp, WebSocket and SSE sessions);
- ``scenarios``, ``measure``, ``report``: the benchmark's scenarios, its CPU
  shares and figures, and its report (targets, tables, profiles);
- ``args``: argparse value types and the loopback-only target check;
- ``tokens``: the gateway's signing secret and tokens minted with it;
- ``loop``: running a coroutine on uvloop when it is installed.

The scripts in ``scripts/`` are thin command lines over these modules.
"""
