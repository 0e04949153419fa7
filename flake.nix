{
  description = "kiln: stateless bare-metal provisioning (reproducible boot bundles, iPXE, boot server)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAll (pkgs: {
        default = pkgs.rustPlatform.buildRustPackage {
          pname = "kiln";
          version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;
          src = pkgs.lib.cleanSource ./.;
          cargoLock.lockFile = ./Cargo.lock;
          nativeBuildInputs = [ pkgs.makeWrapper ];
          # Integration tests boot QEMU and start registries: run them with scripts/test.sh.
          doCheck = false;
          postInstall = ''
            wrapProgram $out/bin/kiln --prefix PATH : ${pkgs.lib.makeBinPath [ pkgs.skopeo pkgs.gnumake pkgs.gcc pkgs.perl pkgs.git ]}
          '';
          meta = {
            description = "Stateless bare-metal provisioning";
            license = pkgs.lib.licenses.asl20;
            mainProgram = "kiln";
          };
        };
      });

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ self.packages.${pkgs.system}.default ];
          packages = with pkgs; [
            cargo rustc clippy rustfmt
            skopeo umoci cpio zstd pigz
            qemu OVMF debootstrap busybox docker-distribution
            xz perl gnumake gcc pkgsCross.aarch64-multiplatform.buildPackages.gcc
          ];
        };
      });
    };
}
