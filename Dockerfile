# The operator image: a static-enough release build on Debian, run on
# distroless (glibc, CA certificates, no shell) as the non-root user 65532,
# which is what the Helm chart's securityContext expects.
FROM rust:1-bookworm AS build
WORKDIR /src
# The libvirt provider links libvirt's client library (the virt crate).
RUN apt-get update && apt-get install -y --no-install-recommends libvirt-dev pkg-config && rm -rf /var/lib/apt/lists/*
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src src
# Cargo.toml names the benchmarks; their sources must exist for it to load.
COPY benches benches
RUN cargo build --release --locked --bin nixops-operator
# The shared libraries the binary needs beyond glibc (libvirt0 and its
# dependencies), for the distroless image, which has glibc only.
RUN mkdir /libs && ldd target/release/nixops-operator | awk '$3 ~ /^\// {print $3}' \
    | grep -vE '/(libc|libm|libdl|libpthread|librt|libgcc_s)\.so' | xargs -r cp --parents -L -t /libs

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /libs/ /
COPY --from=build /src/target/release/nixops-operator /usr/local/bin/nixops-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/nixops-operator"]
CMD ["run"]
