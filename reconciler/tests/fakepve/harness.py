"""fakepve for fleet's tests: a fake PVE 9 cluster on 127.0.0.1, driven over stdin.

Starts fakepve's FakePve in this process (so tests can inject faults and edit the fake's
state while it runs), prints one JSON line with its address, CA file and API token, then
answers one JSON command per stdin line with one JSON line on stdout.

Every request that reaches the fake is kept with its query string and body (`wire`), so
the Rust tests can check each one against the official PVE API schema.
"""

import argparse
import asyncio
import gzip
import json
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid

from fakepve import FakePve
from fakepve import agent as fakepve_agent
from fakepve.certs import make_cert
from fakepve.qemu import DRIVE_KEY

TOKEN_ID = 'fleet@pve!ci'


# Config keys qemu-server guards with VM.Config.Cloudinit (fakepve 0.5.0 asks HWType).
CLOUDINIT_KEYS = ('cicustom', 'cipassword', 'citype', 'ciuser', 'ciupgrade', 'nameserver',
                  'searchdomain', 'sshkeys')
NET_KEY = re.compile(r'net\d+')


class RecordingPve(FakePve):
    """fakepve, recording every request, with the privilege checks of qemu-server that
    fakepve 0.5.0 leaves out: Cloudinit for cloud-init options, Cloudinit and CDROM for a
    cloud-init drive, and SDN.Use on a bridge (PVE 8+, on clone and on every net change).
    Privileges are enforced once a test grants some (op `grant`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wire = []

    def _config_priv(self, key):
        if key in CLOUDINIT_KEYS or key.startswith('ipconfig'):
            return 'VM.Config.Cloudinit'
        return super()._config_priv(key)

    async def _apply_config(self, vm, user, p):
        path = '/vms/{0}'.format(vm.vmid)
        deletes = [k for k in str(p.get('delete', '') or '').split(',') if k]
        for key, value in p.items():
            if DRIVE_KEY.match(key) and str(value).split(',')[0].endswith(':cloudinit'):
                self.require(user, path, 'VM.Config.Cloudinit')
                self.require(user, path, 'VM.Config.CDROM')
            if NET_KEY.fullmatch(key):
                self._check_bridge(user, value)
        for key in deletes + [k for k in p if NET_KEY.fullmatch(k)]:
            if NET_KEY.fullmatch(key) and vm.config.get(key):
                self._check_bridge(user, vm.config[key])
        await super()._apply_config(vm, user, p)

    async def _qm_clone(self, v, user):
        template = self.vm(int(v['vmid']))
        for key, value in (template.config.items() if template else ()):
            if NET_KEY.fullmatch(key):
                self._check_bridge(user, value)
        return await super()._qm_clone(v, user)

    def _record(self, request, body):
        super()._record(request, body)
        self.wire.append({'method': request.method, 'path': request.path,
                          'query': request.query_string, 'contentType': request.content_type,
                          'body': body.decode('utf-8', 'replace')})


class Guests:
    """Real guests for fakepve's VMs: while a VM runs, a real `fleet-agent relay` runs for it,
    and qemu-guest-agent's `exec` really runs its command there (stdin from `input-data`,
    stdout and stderr captured, as qemu-guest-agent does).

    Each guest is a private mount and network namespace (loopback only) with its own tmpfs
    on /run and its own boot id
    (bind-mounted over /proc/sys/kernel/random/boot_id), so the agent keeps its state, its
    tasks and its secrets where it would in a VM, apart from other guests. A stop kills
    every process in the namespace, as powering off would; a start is a new boot.
    """

    def __init__(self, pve, agent_bin, state_dir):
        self.pve = pve
        self.agent_bin = agent_bin
        self.state_dir = state_dir
        self.running = {}   # vmid -> (started_at, Popen, mount namespace)
        self.execs = {}     # (vmid, pid) -> finished result, or None while running
        self.running_enabled = True
        original = fakepve_agent.result

        def result(vm, command, values):
            if vm.vmid in self.running and command in ('exec', 'exec-status'):
                return self.answer(vm, command, values)
            return original(vm, command, values)
        fakepve_agent.result = result

    def answer(self, vm, command, values):
        if command == 'exec':
            vm.agent_pid += 1
            pid = vm.agent_pid
            argv = list(values['command']) if isinstance(values['command'], list) else [values['command']]
            self.execs[(vm.vmid, pid)] = None
            data = values.get('input-data', '')
            thread = threading.Thread(target=self.run, args=(vm.vmid, pid, argv, data), daemon=True)
            thread.start()
            return {'pid': pid}
        done = self.execs.get((vm.vmid, int(values['pid'])))
        if done is None:
            return {'exited': False}
        del self.execs[(vm.vmid, int(values['pid']))]
        return done

    def run(self, vmid, pid, argv, data):
        guest = self.running.get(vmid)
        if guest is None:
            self.execs[(vmid, pid)] = {'exited': True, 'exitcode': 127, 'err-data': 'no guest'}
            return
        if argv and argv[0] == 'fleet-agent':
            argv = [self.agent_bin] + argv[1:]
        try:
            done = subprocess.run(['nsenter', '-t', str(guest[1].pid), '-m', '-n', '--'] + argv,
                                  input=data.encode(), capture_output=True, timeout=30)
            result = {'exited': True, 'exitcode': done.returncode,
                      'out-data': done.stdout.decode('utf-8', 'replace'),
                      'err-data': done.stderr.decode('utf-8', 'replace')}
        except (OSError, subprocess.TimeoutExpired) as e:
            result = {'exited': True, 'exitcode': 1, 'err-data': str(e)}
        self.execs[(vmid, pid)] = result

    def boot(self, vm):
        boot_id = str(uuid.uuid4())
        log = open(os.path.join(self.state_dir, 'guest-{0}.log'.format(vm.vmid)), 'ab')
        # A network namespace of its own with only loopback, as a VM without a NIC: the
        # agent's egress proxy listens there, and nothing in the guest reaches the host's.
        script = ('ip link set lo up && '
                  'mount -t tmpfs -o mode=755 tmpfs /run && echo {0} > /run/.boot_id && '
                  'mount --bind /run/.boot_id /proc/sys/kernel/random/boot_id && exec {1} relay'
                  ).format(boot_id, shlex.quote(self.agent_bin))
        proc = subprocess.Popen(['setpriv', '--pdeathsig', 'KILL', '--', 'unshare', '--mount', '--net',
                                 '--propagation', 'private', '--', 'sh', '-c', script],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        namespace = None
        for _ in range(50):
            try:
                namespace = os.readlink('/proc/{0}/ns/mnt'.format(proc.pid))
                if namespace != os.readlink('/proc/self/ns/mnt'):
                    break
            except OSError:
                pass
            time.sleep(0.01)
        self.running[vm.vmid] = (vm.started_at, proc, namespace)
        vm.agent = {}

    def power_off(self, vmid):
        _, proc, namespace = self.running.pop(vmid)
        for entry in os.listdir('/proc'):
            if not entry.isdigit():
                continue
            try:
                if os.readlink('/proc/{0}/ns/mnt'.format(entry)) == namespace:
                    os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass
        proc.kill()
        proc.wait()

    def sync(self):
        """Guests follow their VMs' power state (a VM with `agent` enabled has one)."""
        if not self.running_enabled:
            return
        live = {vm.vmid: vm for vm in self.pve.vms if not vm.template}
        for vmid in list(self.running):
            vm = live.get(vmid)
            if vm is None or vm.status != 'running' or vm.started_at != self.running[vmid][0]:
                self.power_off(vmid)
                if vm is not None:
                    vm.agent = None
        for vm in live.values():
            wants_agent = str(vm.config.get('agent', '0')).split(',')[0] in ('1', 'enabled=1')
            if vm.status == 'running' and wants_agent and vm.vmid not in self.running:
                self.boot(vm)

    async def follow(self):
        while True:
            self.sync()
            await asyncio.sleep(0.05)

    def close(self):
        for vmid in list(self.running):
            self.power_off(vmid)


def vm_state(vm):
    return {'vmid': vm.vmid, 'name': vm.name, 'node': vm.node, 'status': vm.status,
            'template': bool(vm.template), 'lock': vm.lock, 'config': vm.config, 'pending': vm.pending}


class Control:
    def __init__(self, pve, state_dir):
        self.pve = pve
        self.state_dir = state_dir
        self.guests = None

    def vm(self, vmid):
        found = self.pve.vm(int(vmid))
        if found is None:
            raise KeyError('no VM {0}'.format(vmid))
        return found

    async def handle(self, cmd):
        pve, op = self.pve, cmd['op']
        if op == 'vms':
            return [vm_state(vm) for vm in pve.vms]
        if op == 'wire':
            out, pve.wire = pve.wire, []
            return out
        if op == 'grant':
            # From the first grant on, fakepve enforces privileges for every user but root.
            pve.grant(cmd.get('user', TOKEN_ID.split('!')[0]), cmd.get('path', '/'), *cmd['privs'])
            return None
        if op == 'add_vm':
            vm = pve.add_vm(int(cmd['vmid']), cmd['name'], node=cmd.get('node', 'pve1'),
                            status=cmd.get('status', 'stopped'), config=cmd.get('config', {}),
                            template=cmd.get('template', False))
            return vm_state(vm)
        if op == 'set':
            # Attributes of a FakeVm: shutdown_secs, acpi, status, agent, ...
            vm = self.vm(cmd['vmid'])
            for key, value in cmd['attrs'].items():
                setattr(vm, key, value)
            return vm_state(vm)
        if op == 'config':
            # An edit behind fleet's back (the web UI, another tool).
            vm = self.vm(cmd['vmid'])
            for key, value in cmd.get('set', {}).items():
                vm.config[key] = value
            for key in cmd.get('delete', []):
                vm.config.pop(key, None)
            if 'name' in cmd.get('set', {}):
                vm.name = cmd['set']['name']
            return vm_state(vm)
        if op == 'remove_vm':
            pve.vms.remove(self.vm(cmd['vmid']))
            return None
        if op == 'fail':
            pve.fail(cmd['method'], cmd['suffix'], status=cmd.get('status'), message=cmd.get('message'),
                     error=cmd.get('error'), times=cmd.get('times'))
            return None
        if op == 'clear_faults':
            pve.failures.clear()
            pve.flaky_network(0, 0)
            return None
        if op == 'flaky':
            pve.flaky_network(drop_rate=cmd.get('drop_rate', 0.0), hang_rate=cmd.get('hang_rate', 0.0),
                              hang_secs=cmd.get('hang_secs', 120), seed=cmd.get('seed'))
            pve._random.seed(cmd.get('seed'))
            return None
        if op == 'hold_lock':
            await pve.hold_config_lock(int(cmd['vmid']), cmd['secs'])
            return None
        if op == 'guests':
            # From now on running VMs with `agent` enabled run a real fleet-agent.
            self.guests = Guests(pve, cmd['agentBin'], self.state_dir)
            asyncio.get_running_loop().create_task(self.guests.follow())
            return None
        if op == 'power_off_guests':
            # Before the harness is killed: no guest process outlives the test.
            if self.guests is not None:
                self.guests.close()
                self.guests.running_enabled = False
            return None
        if op == 'time_scale':
            # Real seconds per PVE second: tasks (clone, start, shutdown) take longer or shorter.
            pve.time_scale = float(cmd['scale'])
            return None
        if op == 'latency':
            # PVE seconds every request waits before it is handled.
            pve.network['latency'] = float(cmd['secs'])
            return None
        if op == 'tasks':
            return [dict((k, v) for k, v in t.items() if k != 'log') for t in pve.tasklog]
        if op == 'bundled_schema':
            path = os.path.join(self.state_dir, 'pve-api-schema.json')
            data = os.path.join(os.path.dirname(sys.modules['fakepve'].__file__), 'data', 'pve-api.json.gz')
            with gzip.open(data) as src, open(path, 'wb') as dst:
                dst.write(src.read())
            return path
        raise KeyError('unknown op {0!r}'.format(op))


class DroppedConnectionsAreQuiet(logging.Filter):
    """aiohttp logs a traceback for each connection that ends mid-request: the drops a
    flaky-network test asks fakepve for, and the requests of a fleet the crash test kills.
    Dozens of them would bury a real failure in the test output; the tests check what
    those connections did."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, ConnectionResetError)


async def main():
    logging.getLogger('aiohttp.server').addFilter(DroppedConnectionsAreQuiet())
    parser = argparse.ArgumentParser()
    parser.add_argument('--state-dir', required=True)
    parser.add_argument('--time-scale', type=float, default=0.01)
    args = parser.parse_args()
    certfile, keyfile, _der = make_cert(args.state_dir, hosts=('127.0.0.1',))
    pve = RecordingPve(host='127.0.0.1', port=0)
    pve.time_scale = args.time_scale
    token = secrets.token_hex(16)
    pve.apitokens[TOKEN_ID] = token
    pve.add_node('pve2')
    # The template every fleet VM is cloned from, on storage that allows linked clones.
    pve.storages['local-lvm']['volumes'] = {
        'base-9000-disk-0': {'content': 'images', 'format': 'raw', 'size': 2 * 1024 ** 3, 'vmid': 9000}}
    pve.add_vm(9000, 'debian-tmpl', node='pve1', template=True, config={
        'scsi0': 'local-lvm:base-9000-disk-0,size=2G', 'template': 1, 'cores': 1, 'memory': 512,
        'net0': 'virtio=BC:24:11:00:00:01,bridge=vmbr0', 'ostype': 'l26'})
    await pve.start(certfile, keyfile)
    control = Control(pve, args.state_dir)
    print(json.dumps({'url': pve.url, 'caFile': certfile, 'tokenId': TOKEN_ID, 'token': token}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            reply = {'ok': await control.handle(json.loads(line))}
        except Exception as e:  # noqa: BLE001 - the test reads the error
            reply = {'error': '{0}: {1}'.format(type(e).__name__, e)}
        print(json.dumps(reply), flush=True)
    if control.guests is not None:
        control.guests.close()
    await pve.stop()


if __name__ == '__main__':
    asyncio.run(main())
