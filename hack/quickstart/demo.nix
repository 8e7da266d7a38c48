# The quickstart's demo "NixOS system": no nixpkgs needed, just a store path
# shaped like config.system.build.toplevel, with a package it refers to and
# a bin/switch-to-configuration that activates it (points
# /run/current-system at it and shows the message in /run/motd).
#
#   nix-build hack/quickstart/demo.nix --argstr message 'hello again'
{ message ? "hello from nixops-operator" }:
let
  mk = name: script: builtins.derivation {
    inherit name;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
  };
  motd = mk "motd" "echo '${message}' > $out";
in
mk "nixos-system-demo" ''
  /bin/mkdir -p $out/bin
  echo ${motd} > $out/packages
  /bin/cat > $out/bin/switch-to-configuration <<EOS
  #!/bin/sh
  set -e
  /bin/mkdir -p /run/quickstart
  echo "\$1 $out" >> /run/quickstart/activations
  case "\$1" in switch|test) /bin/ln -sfn $out /run/current-system; /bin/cp ${motd} /run/motd ;; esac
  EOS
  /bin/chmod +x $out/bin/switch-to-configuration
''
