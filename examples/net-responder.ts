// A NIC in ~40 lines of TypeScript: a host at IP 10.80.0.2 that answers ARP and ping. Attach it, give
// the interface the kernel makes an address in 10.80.0.0/24, and `ping 10.80.0.2` is answered from here.
import { NetDevice, type NetDeviceOptions } from '../src'

const MAC = Buffer.from([0x02, 0x00, 0x00, 0x00, 0x80, 0x02])
const IP = Buffer.from([10, 80, 0, 2])

/** The Internet checksum of `b` (with its checksum field zeroed). */
function checksum(b: Buffer): number {
  let sum = 0
  for (let i = 0; i + 1 < b.length; i += 2) sum += b.readUInt16BE(i)
  if (b.length % 2) sum += b[b.length - 1]! << 8
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16)
  return ~sum & 0xffff
}

export async function createResponder(options: Partial<NetDeviceOptions> = {}): Promise<NetDevice> {
  const nic = await NetDevice.create({
    name: 'responder',
    mac: '02:00:00:00:80:02',
    offloads: false,
    ...options,
  })
  nic.on('frame', (frame) => {
    const type = frame.readUInt16BE(12)
    const reply = Buffer.from(frame) // the frame is only valid during this call: answer from a copy
    frame.copy(reply, 0, 6, 12) // to the sender…
    MAC.copy(reply, 6) // …from us
    if (type === 0x0806 && frame.readUInt16BE(20) === 1 && frame.subarray(38, 42).equals(IP)) {
      reply.writeUInt16BE(2, 20) // ARP reply: we are IP, at MAC
      MAC.copy(reply, 22)
      IP.copy(reply, 28)
      frame.copy(reply, 32, 22, 32) // the asker's MAC and IP
      nic.send(reply)
    } else if (type === 0x0800 && frame[23] === 1 && frame.subarray(30, 34).equals(IP)) {
      const ihl = (frame[14]! & 0x0f) * 4
      if (frame[14 + ihl] !== 8) return // ICMP echo requests only
      frame.copy(reply, 30, 26, 30) // IP: back to the sender…
      IP.copy(reply, 26) // …from us
      reply.writeUInt16BE(0, 24)
      reply.writeUInt16BE(checksum(reply.subarray(14, 14 + ihl)), 24)
      const icmp = reply.subarray(14 + ihl, 14 + frame.readUInt16BE(16))
      icmp[0] = 0 // echo reply
      icmp.writeUInt16BE(0, 2)
      icmp.writeUInt16BE(checksum(icmp), 2)
      nic.send(reply)
    }
  })
  return nic
}

if (require.main === module) {
  void (async () => {
    const nic = await createResponder()
    const ifname = await nic.attach()
    console.log(`ip addr add 10.80.0.1/24 dev ${ifname} && ip link set ${ifname} up && ping 10.80.0.2`)
    process.once('SIGINT', () => void nic.close())
  })()
}
