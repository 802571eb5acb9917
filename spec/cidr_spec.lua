-- smtp.cidr: the trusted-peer lists of proxy_protocol and xclient (addresses and networks, IPv4
-- and IPv6, an IPv4-mapped IPv6 peer matching as IPv4).
local cidr = require "smtp.cidr"

describe("smtp.cidr", function()
  it("matches addresses and networks of both families", function()
    local m = assert(cidr.list { "127.0.0.1", "10.0.0.0/8", "192.0.2.128/25", "2001:db8::/32", "::1" })
    local want = { ["127.0.0.1"] = true, ["127.0.0.2"] = false, ["10.255.1.2"] = true, ["11.0.0.1"] = false,
      ["192.0.2.200"] = true, ["192.0.2.127"] = false, ["2001:db8:ffff::1"] = true, ["2001:db9::1"] = false,
      ["::1"] = true, ["::2"] = false, ["::ffff:10.1.2.3"] = true, ["::ffff:127.0.0.2"] = false,
      ["0:0:0:0:0:0:0:1"] = true, ["not an address"] = false, [""] = false }
    for ip, yes in pairs(want) do assert.equal(yes, m(ip), ip) end
  end)

  it("reads IPv6 in all its spellings into 16 bytes, IPv4 into 4", function()
    assert.equal(("\0"):rep(15) .. "\1", cidr.bytes("::1"))
    assert.equal(cidr.bytes("2001:db8::1"), cidr.bytes("2001:0DB8:0:0:0:0:0:1"))
    assert.equal(cidr.bytes("64:ff9b::c000:201"), cidr.bytes("64:ff9b::192.0.2.1"))
    assert.equal("\192\0\2\1", cidr.bytes("::ffff:192.0.2.1"))
    for _, bad in ipairs { "1::2::3", "1:2:3:4:5:6:7:8:9", "12345::", "256.1.1.1", "1.2.3", ":1", "g::1" } do
      assert.is_nil(cidr.bytes(bad), bad)
    end
  end)

  it("refuses what is not a list of addresses or networks, saying which entry", function()
    assert.same({ nil, "a list of addresses expected" }, { cidr.list("127.0.0.1") })
    assert.same({ nil, "entry 2: not an address or network: localhost" }, { cidr.list { "::1", "localhost" } })
    assert.same({ nil, "entry 1: prefix length out of range: 10.0.0.0/33" }, { cidr.list { "10.0.0.0/33" } })
    assert.same({ nil, "entry 1: string expected" }, { cidr.list { 10 } })
  end)
end)
