// Two (or more) NICs wired through the JavaScript path of `NetSwitch` (`connect()`: every frame a `frame`
// event and a `send()`), for the network bench's comparison with the native switch `vduse net --switch`
// uses. Prints a `ready` line per NIC, as the CLI does; SIGTERM closes them.
import { NetDevice, NetSwitch } from '../src'

async function main(): Promise<void> {
  const sw = new NetSwitch()
  const nics: NetDevice[] = []
  process.once('SIGTERM', () => {
    void Promise.allSettled(nics.map((n) => n.close())).then(() => process.exit(0))
  })
  for (const name of process.argv.slice(2)) {
    const nic = await NetDevice.create({ name, replaceStale: true })
    nics.push(nic)
    sw.connect(nic)
    const path = await nic.attach()
    console.log(JSON.stringify({ event: 'ready', name, path }))
  }
}

main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
