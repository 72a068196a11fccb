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
import os
import secrets
import sys

from fakepve import FakePve
from fakepve.certs import make_cert

TOKEN_ID = 'fleet@pve!ci'


class RecordingPve(FakePve):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wire = []

    def _record(self, request, body):
        super()._record(request, body)
        self.wire.append({'method': request.method, 'path': request.path,
                          'query': request.query_string, 'contentType': request.content_type,
                          'body': body.decode('utf-8', 'replace')})


def vm_state(vm):
    return {'vmid': vm.vmid, 'name': vm.name, 'node': vm.node, 'status': vm.status,
            'template': bool(vm.template), 'lock': vm.lock, 'config': vm.config, 'pending': vm.pending}


class Control:
    def __init__(self, pve, state_dir):
        self.pve = pve
        self.state_dir = state_dir

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
        if op == 'tasks':
            return [dict((k, v) for k, v in t.items() if k != 'log') for t in pve.tasklog]
        if op == 'bundled_schema':
            path = os.path.join(self.state_dir, 'pve-api-schema.json')
            data = os.path.join(os.path.dirname(sys.modules['fakepve'].__file__), 'data', 'pve-api.json.gz')
            with gzip.open(data) as src, open(path, 'wb') as dst:
                dst.write(src.read())
            return path
        raise KeyError('unknown op {0!r}'.format(op))


async def main():
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
    await pve.stop()


if __name__ == '__main__':
    asyncio.run(main())
