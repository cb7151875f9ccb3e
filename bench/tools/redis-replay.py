#!/usr/bin/env python3
"""Replays one job's Redis requests, captured with MONITOR, for many jobs, and reports how
much of Redis each request costs: the profile behind the Lua cuts in docs/benchmarks.md.

    # while `pictor-bench --only peer` (or a --baseline run) drives scenario 8's load:
    timeout 1 redis-cli monitor > /tmp/monitor.txt
    bench/tools/redis-replay.py /tmp/monitor.txt JOB_ID [JOBS] [BATCH]

JOB_ID is a job whose whole life is in the capture (its intake through its lease's release:
the script lists the requests it found). While the clients post faster than the worker ends
jobs, a job's intake and its run can be seconds apart: then capture once while the clients
post and once after (while the backlog drains), take one job's api requests from the first
and another job's worker requests from the second with that job's id replaced by the first's
(`sed`), and replay the spliced file; the keys' prefix must be the same run's. Each replayed job gets fresh ids (UUIDs and 32-hex
call and hold ids) and its own key prefix, so the scripts take the same paths as in the run;
BATCH jobs (64) go in lockstep, each step pipelined for all of them, as a busy worker's
multiplexed connection sends them. The scripts must be loaded (EVALSHA): run one job through
the same build first. Per request it prints the execution time Redis counted
(INFO commandstats: usec of EVALSHA, which excludes the I/O), and over all of it the
redis-server process's CPU per job from /proc (which includes it). Variants of a script can
be tried without a build: VARIANT=file.py defining VARIANTS = {sha_prefix: lua_text}
replays the new text in place of the script whose SHA starts with sha_prefix (same keys and
arguments). No dependencies beyond Python 3; the replay's keys are deleted at the end.
"""
import collections
import os
import re
import socket
import sys
import time
import uuid

capture, job_id = sys.argv[1], sys.argv[2]
jobs = int(sys.argv[3]) if len(sys.argv) > 3 else 6400
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 64


def parse(line):
    body = line.split('] ', 1)[1]
    return [bytes(m.group(1), 'utf8').decode('unicode_escape').encode('latin1')
            for m in re.finditer(r'"((?:[^"\\]|\\.)*)"', body)]


lines = open(capture, errors='replace').read().splitlines()
requests = [parse(l) for l in lines if '[0 lua]' not in l and '"' in l and job_id in l]
if not requests:
    sys.exit(f'no request of job {job_id} in {capture}')
prefix = re.search(rb'([A-Za-z0-9_.{}-]+):job:' + job_id.encode(), b' '.join(requests[0])).group(1)
connection = socket.create_connection(('127.0.0.1', int(os.environ.get('REDIS_PORT', '6379'))))
connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
replies = connection.makefile('rb')


def encode(args):
    return b''.join([b'*%d\r\n' % len(args)] + [b'$%d\r\n%s\r\n' % (len(a), a) for a in args])


def read():
    line = replies.readline()
    kind = line[:1]
    if kind == b'-':
        raise RuntimeError(line.decode().strip())
    if kind == b'$':
        size = int(line[1:])
        return replies.read(size + 2)[:-2] if size >= 0 else None
    if kind == b'*':
        return [read() for _ in range(max(int(line[1:]), 0))]
    return line[1:].strip()


def pipeline(commands):
    connection.sendall(b''.join(encode(c) for c in commands))
    return [read() for _ in commands]


def script_usec():
    info = pipeline([[b'INFO', b'commandstats']])[0].decode()
    found = re.search(r'cmdstat_evalsha:calls=\d+,usec=(\d+)', info)
    return int(found.group(1)) if found else 0


if os.environ.get('VARIANT'):
    space = {}
    exec(open(os.environ['VARIANT']).read(), space)
    for sha_prefix, text in space['VARIANTS'].items():
        sha = pipeline([[b'SCRIPT', b'LOAD', text.encode()]])[0]
        for request in requests:
            if request[0] == b'EVALSHA' and request[1].startswith(sha_prefix.encode()):
                request[1] = sha

# The server replayed against, as it names itself (not whichever redis-server runs first).
server = int(re.search(r'process_id:(\d+)', pipeline([[b'INFO', b'server']])[0].decode()).group(1))


def server_cpu():
    fields = open(f'/proc/{server}/stat').read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


ids = re.compile(rb'(?<![0-9a-f])(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
                 rb'|[0-9a-f]{32})(?![0-9a-f])')
replay_prefix = b'replay-' + uuid.uuid4().hex[:8].encode()


def fresh(value, seen):
    value = value.replace(prefix, replay_prefix)
    return ids.sub(lambda found: seen.setdefault(
        found.group(0),
        (str(uuid.uuid4()) if b'-' in found.group(0) else uuid.uuid4().hex).encode()), value)


names = [(r[0] + b' ' + (r[1][:8] if r[0] == b'EVALSHA' else b'')).decode() for r in requests]
spent = collections.Counter()
print(f'{len(requests)} requests a job:', ', '.join(names))
cpu_before, started = server_cpu(), time.time()
try:
    for first in range(0, jobs, batch):
        seen = [{} for _ in range(batch)]
        for request, name in zip(requests, names):
            before = script_usec()
            answers = pipeline([[fresh(part, mine) for part in request] for mine in seen])
            spent[name] += script_usec() - before
            if first == 0:
                print(f'  first answer to {name}: {repr(answers[0])[:120]}')
finally:
    keys = []
    cursor = b'0'
    while True:
        cursor, found = pipeline([[b'SCAN', cursor, b'MATCH', replay_prefix + b'*', b'COUNT', b'10000']])[0]
        keys += found
        if cursor == b'0':
            break
    for start in range(0, len(keys), 1000):
        pipeline([[b'DEL'] + keys[start:start + 1000]])
print(f'Redis CPU {1000 * (server_cpu() - cpu_before) / jobs:.3f} ms a job '
      f'({jobs} jobs in {time.time() - started:.1f} s; INFO calls included)')
for name in dict.fromkeys(names):
    count = names.count(name)
    print(f'  {name:20s} x{count}  {spent[name] / jobs / count:6.1f} µs a call')
print(f'  all scripts: {sum(spent.values()) / jobs:.1f} µs a job')
