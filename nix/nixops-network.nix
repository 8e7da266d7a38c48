# What a NixOS machine needs for its Network's runtime membership and mesh,
# as nixops-operator writes them over SSH (no closure rebuild when members
# change). Import it into every member's configuration:
#
#   imports = [ ./nixops-network.nix ];
#   services.nixops-network.enable = true;
#   services.nixops-network.mesh.listenPort = 51820;   # the Network's spec.mesh.wireguard.listenPort
#
# It provides:
# - wireguard-tools (`wg`): the operator configures the interface `nixops0`
#   with `wg syncconf`, so peers change without tearing down working tunnels;
#   kernel WireGuard is in every supported NixOS kernel;
# - the mesh's UDP port in the firewall, and the mesh interface trusted;
# - names: /etc/hosts becomes a symlink to /run/nixops/hosts, which is this
#   system's own hosts file (kept as /etc/nixops/hosts.base) followed by the
#   operator's block of members (/run/nixops/hosts.network). The activation
#   script joins them at boot and on every switch; the operator does it
#   whenever membership changes. /run/nixops/network.json (root only) lists
#   every member's name, addresses, SSH host key and mesh address, for
#   services that read peers from there.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.nixops-network;
in
{
  options.services.nixops-network = {
    enable = lib.mkEnableOption "the runtime membership and WireGuard mesh nixops-operator manages";

    mesh.enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Open the firewall for the Network's WireGuard mesh (spec.mesh.wireguard) and install wireguard-tools.";
    };

    mesh.listenPort = lib.mkOption {
      type = lib.types.port;
      default = 51820;
      description = "The UDP port of the mesh: the Network's spec.mesh.wireguard.listenPort.";
    };

    mesh.interface = lib.mkOption {
      type = lib.types.str;
      default = "nixops0";
      readOnly = true;
      description = "The WireGuard interface the operator configures (fixed).";
    };
  };

  config = lib.mkIf cfg.enable {
    environment.systemPackages = lib.optionals cfg.mesh.enable [ pkgs.wireguard-tools ];
    boot.extraModulePackages = lib.optionals
      (cfg.mesh.enable && lib.versionOlder config.boot.kernelPackages.kernel.version "5.6")
      [ config.boot.kernelPackages.wireguard ];

    networking.firewall.allowedUDPPorts = lib.optionals cfg.mesh.enable [ cfg.mesh.listenPort ];
    networking.firewall.trustedInterfaces = lib.optionals cfg.mesh.enable [ cfg.mesh.interface ];
    # NetworkManager and systemd-networkd leave the operator's interface alone.
    networking.networkmanager.unmanaged = lib.optionals cfg.mesh.enable [ "interface-name:${cfg.mesh.interface}" ];

    # The system's own hosts file, as NixOS would have made /etc/hosts.
    environment.etc."nixops/hosts.base".source = pkgs.concatText "hosts" config.networking.hostFiles;
    environment.etc.hosts.source = lib.mkForce "/run/nixops/hosts";

    system.activationScripts.nixops-network-hosts = lib.stringAfter [ "etc" ] ''
      mkdir -p /run/nixops
      chmod 0755 /run/nixops
      block=/run/nixops/hosts.network
      { cat /etc/nixops/hosts.base; if [ -e "$block" ]; then cat "$block"; fi; } > /run/nixops/hosts.tmp
      chmod 0644 /run/nixops/hosts.tmp
      mv -f /run/nixops/hosts.tmp /run/nixops/hosts
    '';
  };
}
